"""ReTool: tool-integrated RL where the policy writes Python, a sandbox runs it, and the answer is boxed."""
