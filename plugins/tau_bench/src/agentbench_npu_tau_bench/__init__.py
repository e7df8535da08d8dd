"""τ-bench for agentbench-npu: a retail domain, simulated users, database-state reward, eval and train modes."""
