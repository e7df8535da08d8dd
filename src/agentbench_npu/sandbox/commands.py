"""`agentbench-npu sandbox …`: check a sandbox backend against the contract, or serve it as SandboxFusion."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from ..errors import UserError, one_line
from .base import SandboxError, SandboxLimits


def _provider(ctx: click.Context, backend: str, wall: float, memory: int, image: str, isolation: str) -> Any:
    factory = ctx.find_root().obj.get("sandbox", backend).obj
    limits = SandboxLimits(wall_seconds=wall, cpu_seconds=wall, memory_mb=memory)
    return factory(limits, {"image": image, "isolation": isolation})


def _backend_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--backend", default="local", show_default=True, help="a registered sandbox (see `list`)"),
        click.option("--wall-seconds", "wall", default=3.0, show_default=True, type=float,
                     help="wall and CPU limit per exec"),
        click.option("--memory-mb", "memory", default=256, show_default=True, type=int),
        click.option("--image", default="", help="docker / modal image (default: the backend's)"),
        click.option("--isolation", default="auto", show_default=True,
                     type=click.Choice(["auto", "namespaces", "rlimits"]), help="local backend only"),
    ]):
        fn = option(fn)
    return fn


@click.group()
def sandbox() -> None:
    """Sandbox backends: check one against the contract, or serve one over HTTP."""


@sandbox.command()
@_backend_options
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["contract", "hostile"]),
              help="which checks (default: both)")
@click.option("--check", "names", multiple=True, metavar="NAME", help="only these checks")
@click.pass_context
def check(ctx: click.Context, backend: str, wall: float, memory: int, image: str, isolation: str,
          kinds: tuple[str, ...], names: tuple[str, ...]) -> None:
    """Run the conformance suite (contract and hostile code) against BACKEND. Exit 1 if a check fails."""
    from rich.console import Console
    from rich.table import Table

    from .conformance import run_checks

    provider = _provider(ctx, backend, wall, memory, image, isolation)

    async def go() -> tuple[list[Any], dict[str, Any]]:
        async with provider:
            return await run_checks(provider, names or None, kinds or ("contract", "hostile")), provider.describe()

    try:
        results, described = asyncio.run(go())
    except (SandboxError, ValueError) as exc:
        raise UserError(f"sandbox '{backend}': {one_line(exc)}") from exc
    table = Table(title=f"sandbox {backend} ({described.get('isolation', 'isolation not reported')})",
                  title_justify="left")
    for column in ("check", "kind", "result", "seconds", "detail"):
        table.add_column(column)
    for r in results:
        verdict = "[green]pass[/]" if r.passed else ("[yellow]skip[/]" if r.passed is None else "[red]FAIL[/]")
        table.add_row(r.name, r.kind, verdict, f"{r.seconds:.2f}", r.detail)
    Console().print(table)
    failed = [r.name for r in results if r.passed is False]
    ctx.exit(1 if failed else 0)


@sandbox.command()
@_backend_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.pass_context
def serve(ctx: click.Context, backend: str, wall: float, memory: int, image: str, isolation: str, host: str,
          port: int) -> None:
    """Serve BACKEND over SandboxFusion's API: POST /run_code (each request in a fresh sandbox)."""
    from .fusion import serve_fusion

    provider = _provider(ctx, backend, wall, memory, image, isolation)
    click.echo(f"SandboxFusion /run_code over sandbox '{backend}' on http://{host}:{port}", err=True)
    serve_fusion(provider, host=host, port=port)
