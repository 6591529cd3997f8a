"""`ds4 serve`: the OpenAI + Anthropic compatible HTTP server."""
import logging

import click

from .cli_run import NUMERICS_OPTION
from .errors import Error


def open_kv_cache(directory, space_mb, model):
    """The disk KV cache (ds4.kv_disk), imported only when asked for."""
    from .kv_disk import DiskKVCache
    log = logging.getLogger("ds4.kv_disk")
    return DiskKVCache(directory, space_mb, model, log=log.info)


@click.command()
@click.option("-m", "--model", "model_path", default=None,
              help="GGUF file (default: $DS4_MODEL, ./ds4flash.gguf, the download dir).")
@click.option("--backend", default="auto", type=click.Choice(["auto", "cpu", "cuda", "metal"]))
@click.option("-t", "--threads", default=None, type=int, help="CPU threads.")
@NUMERICS_OPTION
@click.option("--warm-weights", is_flag=True,
              help="Read the whole model file before serving (progress shown).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to accept other machines).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--ctx", default=32768, show_default=True, type=click.IntRange(min=16),
              help="Context size in tokens.")
@click.option("--kv-disk-dir", default=None, type=click.Path(file_okay=False),
              help="Keep KV checkpoints in this directory (prefix reuse across restarts).")
@click.option("--kv-disk-space-mb", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Disk budget of the KV cache.")
@click.option("--cors", is_flag=True, help="Allow browser clients from any origin.")
@click.option("--api-key", default=None, envvar="DS4_API_KEY",
              help="Require this key (Authorization: Bearer KEY or x-api-key: KEY).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for the worker; more get HTTP 429.")
@click.option("--max-body-mb", default=64, show_default=True, type=click.IntRange(min=1),
              help="Largest request body accepted (HTTP 413 above).")
@click.option("-v", "--verbose", is_flag=True, help="Log each request's cache decision.")
@click.option("--trace", "trace_path", default=None, type=click.Path(dir_okay=False),
              help="Append a human-readable log of every request (raw JSON, cache decision, "
                   "rendered prompt, generated text, tool calls) to this file.")
def serve(model_path, backend, threads, numerics, warm_weights, host, port, ctx, kv_disk_dir,
          kv_disk_space_mb, cors, api_key, max_queue, max_body_mb, verbose, trace_path):
    """Serve the model over HTTP (OpenAI chat/completions/responses, Anthropic messages)."""
    from .server import Server, listen_sockets, load_engine, serve as run_server
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ds4: %(message)s")
    # the port and the trace file first: either failing fails now, not after the model's load
    trace = None
    if trace_path:
        from .server.trace import Trace
        try:
            trace = Trace(trace_path)
        except OSError as exc:
            raise Error(f"cannot open the trace file {trace_path}: {exc.strerror}") from None
    try:
        socks = listen_sockets(host, port)
    except OSError as exc:
        raise Error(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        engine = load_engine(model_path, ctx=ctx, backend=backend, threads=threads,
                             warm_weights=warm_weights, numerics=numerics)
        kv_cache = None
        if kv_disk_dir:
            kv_cache = open_kv_cache(kv_disk_dir, kv_disk_space_mb, engine.model)
        server = Server(engine, max_queue=max_queue, kv_cache=kv_cache, api_key=api_key, cors=cors,
                        max_body_mb=max_body_mb, trace=trace)
        run_server(server, socks, host, log_fn=lambda s: click.echo(s, err=True))
    finally:
        for sock in socks:
            sock.close()
