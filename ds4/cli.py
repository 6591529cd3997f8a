"""The `ds4` command line."""
import sys
from collections import Counter

import click

from .errors import Error


class Ds4Group(click.Group):
    """Turns ds4's own errors into one clear line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Error as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"ds4: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\nds4: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Ds4Group)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="ds4")
def main(debug):
    """DeepSeek V4 Flash from its published GGUF files."""


def _align(x, a):
    return -(-x // a) * a


def kv_bytes_per_token(cfg, compact=False):
    """Growing KV state per token (forward-pass.md §6.2): compressed rows and
    indexer keys, float32; compact: as the CUDA backend keeps a qat session's
    (§6.4: E4M3 / E2M1 codes and a scale byte a block, RoPE dims float32)."""
    row, idx_row = 4 * cfg.head_dim, 4 * cfg.indexer_dim
    if compact:
        nope = cfg.head_dim - cfg.rope_dim
        row = _align(nope + -(-nope // 64), 16) + 4 * cfg.rope_dim
        idx_row = _align(cfg.indexer_dim // 2 + -(-cfg.indexer_dim // 32), 4)
    total = 0
    for ratio in cfg.compress_ratios:
        if ratio:
            total += row / ratio
        if ratio == 4:
            total += idx_row / ratio
    return total


def kv_memory_bytes(cfg, ctx, compact=False):
    """KV state of a full context: the growing part plus every layer's raw window."""
    return kv_bytes_per_token(cfg, compact) * ctx + cfg.n_layer * cfg.sliding_window * cfg.head_dim * 4


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ctx", default=32768, show_default=True, help="Context for the memory estimate.")
def info(model, ctx):
    """Show a model file's shape, tensor census and memory needs."""
    from .model import load
    with load(model) as m:
        c = m.config
        click.echo(f"file:      {m.path}")
        click.echo(f"model:     {c.profile} ({c.variant} routed experts)")
        click.echo(f"shape:     {c.n_layer} layers, embd {c.n_embd}, vocab {c.n_vocab}, "
                   f"{c.n_head} heads x {c.head_dim}, {c.n_expert} experts (top {c.n_expert_used})")
        ratios = Counter(c.compress_ratios)
        click.echo("attention: " + ", ".join(f"{n} layers ratio {r}" for r, n in sorted(ratios.items())))
        by_type = Counter()
        bytes_by_type = Counter()
        for t in m.gguf.tensors.values():
            by_type[t.type_name] += 1
            bytes_by_type[t.type_name] += max(t.nbytes, 0)
        total = sum(bytes_by_type.values())
        click.echo(f"tensors:   {len(m.gguf.tensors)}, {total / 2**30:.2f} GiB")
        for name, n in sorted(by_type.items(), key=lambda kv: -bytes_by_type[kv[0]]):
            click.echo(f"  {name:8s} {n:5d} tensors  {bytes_by_type[name] / 2**30:9.3f} GiB")
        click.echo(f"memory at ctx {ctx}: weights {total / 2**30:.2f} GiB (mapped) + "
                   f"KV {kv_memory_bytes(c, ctx) / 2**30:.2f} GiB (float32; "
                   f"{kv_memory_bytes(c, ctx, compact=True) / 2**30:.2f} GiB compact: CUDA, qat modes)")
        for w in m.warnings:
            click.echo(f"warning:   {w}")


# Commands defined beside this group, one module each.
from .cli_bench import bench_cmd  # noqa: E402
from .cli_download import download  # noqa: E402
from .cli_run import chat, run  # noqa: E402
from .cli_serve import serve  # noqa: E402

main.add_command(run)
main.add_command(chat)
main.add_command(download)
main.add_command(serve)
main.add_command(bench_cmd, "bench")

if __name__ == "__main__":
    main()
