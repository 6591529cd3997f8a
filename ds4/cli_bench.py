"""`ds4 bench`: prefill and decode throughput at context frontiers (CSV, table, plot)."""
import os
import sys
import tempfile
import time

import click

from . import bench
from .cli_run import NUMERICS_OPTION
from .errors import Error


class OneLineUsage(click.UsageError):
    def show(self, file=None):
        click.echo(f"ds4: bench: {self.format_message()}", err=True)


class BenchCommand(click.Command):
    """Reports bad options on one line (exit status 2), like ds4's other errors."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise OneLineUsage(exc.format_message()) from None


class Progress:
    """One rewritten line on a terminal; a line per frontier otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, frontier, stage, done, total):
        if not self.tty:
            if stage == "prefill" and done == 0:
                click.echo(f"ds4: bench: prefilling {total} tokens to {frontier}", err=True)
            return
        now = time.monotonic()
        if now - self.last > 0.2 or done == total:
            self.last = now
            click.echo(f"\r\x1b[Kds4: bench: frontier {frontier}: {stage} {done}/{total}",
                       err=True, nl=False)

    def end(self):
        if self.tty:
            click.echo("\r\x1b[K", err=True, nl=False)


TABLE = "{:>10} {:>10} {:>12} {:>8} {:>10} {:>14}"


@click.command(cls=BenchCommand)
@click.option("-m", "--model", "model_path", default=None,
              help="GGUF file (default: $DS4_MODEL, ./ds4flash.gguf, the download dir).")
@click.option("--synthetic", type=click.Choice(["q2", "q4"]), default=None,
              help="Benchmark a generated full-size Flash file with random weights.")
@click.option("--backend", default="auto", type=click.Choice(["auto", "cpu", "cuda", "metal"]))
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1), help="CPU threads.")
@NUMERICS_OPTION
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to walk (default: the shipped English text).")
@click.option("--ctx-start", default=None, type=click.IntRange(min=1),
              help=f"First frontier (default: {bench.CTX_START}, or ctx-max if smaller).")
@click.option("--ctx-max", default=bench.CTX_MAX, show_default=True, type=click.IntRange(min=1),
              help="Last frontier.")
@click.option("--step-incr", default=bench.STEP_INCR, show_default=True,
              type=click.IntRange(min=1), help="Tokens between frontiers.")
@click.option("--gen-tokens", default=bench.GEN_TOKENS, show_default=True,
              type=click.IntRange(min=1), help="Tokens decoded at each frontier.")
@click.option("--ctx", default=None, type=click.IntRange(min=1),
              help="Session context (default: ctx-max + gen-tokens).")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the CSV there ('-': CSV on stdout instead of the table).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw prefill and decode tok/s against context (PNG, needs matplotlib).")
@click.option("--host-steps", is_flag=True,
              help="Decode by eval and the host's argmax (or draw) a token instead of the "
                   "backend's own steps.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Decode the draws of a sampler at this temperature (min_p 0.05, seed 1) "
                   "instead of greedy choices; 0: greedy.")
@click.option("--batch-report", is_flag=True,
              help="Compare decode traffic with the device's measured copy bandwidth.")
def bench_cmd(model_path, synthetic, backend, threads, numerics, prompt_file, ctx_start, ctx_max,
              step_incr, gen_tokens, ctx, csv_path, plot_path, host_steps, temperature, batch_report):
    """Prefill and decode throughput as the context grows."""
    if synthetic and model_path:
        raise OneLineUsage("give -m MODEL or --synthetic, not both")
    if ctx_start is None:
        ctx_start = min(bench.CTX_START, ctx_max)
    try:        # option errors before any work
        bench.frontiers(ctx_start, ctx_max, step_incr)
        ctx = bench.session_ctx(ctx, ctx_max, gen_tokens)
    except Error as exc:
        raise OneLineUsage(str(exc)) from None
    if plot_path:
        bench.require_matplotlib()
    text = None
    if prompt_file:
        with open(prompt_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    with tempfile.TemporaryDirectory(prefix="ds4-bench-") as tmp:
        model = open_bench_model(model_path, synthetic, backend, ctx, threads, numerics, tmp)
        with model:
            if batch_report:
                bench.bandwidth_probe(model)     # a missing probe fails before the walk
            sampler = None
            if temperature > 0:
                from .sampling import Sampler
                sampler = Sampler(temperature=temperature, min_p=0.05, seed=1)
            rows = run_walk(model, ctx_start, ctx_max, step_incr, gen_tokens, ctx, text,
                            csv_path, host_steps, sampler)
            report = None
            if batch_report:
                click.echo("ds4: bench: measuring copy bandwidth", err=True)
                report = bench.batch_report(rows, bench.decode_bytes(model),
                                            bench.copy_bandwidth(model))
            title = f"{os.path.basename(model.path)} ({model.backend}, {model.numerics})"
    if report:
        out = sys.stderr if csv_path == "-" else sys.stdout
        for line in report:
            click.echo(line, file=out)
    if plot_path:
        bench.plot(rows, plot_path, title)
        click.echo(f"ds4: bench: plot written to {plot_path}", err=True)


def open_bench_model(model_path, synthetic, backend, ctx, threads, numerics, tmp):
    from .model import load
    if not synthetic:
        return load(model_path, backend=backend, ctx=ctx, threads=threads, numerics=numerics)
    path = bench.write_synthetic(tmp, synthetic)
    model = load(path, backend=backend, ctx=ctx, threads=threads, numerics=numerics,
                 synthetic=True)
    if model.backend == "cpu":
        click.echo("ds4: warning: --synthetic on cpu runs on the file's zeros: the numbers "
                   "measure the compute path only, and a Flash-size token takes seconds "
                   "(the first ~20 s on 2 cores)", err=True)
    return model


def run_walk(model, ctx_start, ctx_max, step_incr, gen_tokens, ctx, text, csv_path, host_steps=False,
             sampler=None):
    """Runs the walk, printing each row as it completes; returns the rows."""
    csv_file = None
    if csv_path and csv_path != "-":
        try:
            csv_file = open(csv_path, "w", encoding="utf-8")
        except OSError as exc:
            raise Error(f"cannot write {csv_path}: {exc.strerror}") from None
    to_stdout_csv = csv_path == "-"
    header = ",".join(bench.CSV_COLUMNS)
    if to_stdout_csv:
        click.echo(header)
    else:
        click.echo(TABLE.format(*bench.CSV_COLUMNS))
    if csv_file:
        csv_file.write(header + "\n")
    progress = Progress()
    rows = []
    try:
        for row in bench.walk(model, ctx_start=ctx_start, ctx_max=ctx_max, step_incr=step_incr,
                              gen_tokens=gen_tokens, ctx=ctx, text=text, progress=progress,
                              host_steps=host_steps, sampler=sampler):
            progress.end()
            rows.append(row)
            if to_stdout_csv:
                click.echo(row.csv())
            else:
                click.echo(TABLE.format(row.ctx_tokens, row.prefill_tokens,
                                        f"{row.prefill_tps:.2f}", row.gen_tokens,
                                        f"{row.gen_tps:.2f}", row.kvcache_bytes))
            if csv_file:
                csv_file.write(row.csv() + "\n")
                csv_file.flush()
    finally:
        if csv_file:
            csv_file.close()
    return rows
