"""`ds4 run` and `ds4 chat`: generation from the command line."""
import os
import sys
import time

import click

from . import chat as tmpl
from .errors import Error
from .generation import Generation, segments_to_ids, stream
from .sampling import Sampler

GREY = "\x1b[90m"
RESET = "\x1b[0m"


# one definition for run, chat, serve and bench
NUMERICS_OPTION = click.option(
    "--numerics", default="qat", show_default=True, type=click.Choice(["qat", "exact", "qat-q8"]),
    help="qat: as DeepSeek's reference; exact: pure float32; qat-q8: qat with int8 activations "
         "into quantized products, as antirez/ds4 (faster on CUDA).")


def model_options(f):
    """The options `run` and `chat` share (api.md, prompt-and-server.md §7)."""
    opts = [
        click.option("-m", "--model", "model_path", default=None,
                     help="GGUF file (default: $DS4_MODEL, ./ds4flash.gguf, the download dir)."),
        click.option("--backend", default="auto", type=click.Choice(["auto", "cpu", "cuda", "metal"])),
        click.option("--ctx", default=32768, show_default=True, help="Context size in tokens."),
        NUMERICS_OPTION,
        click.option("-t", "--threads", default=None, type=int, help="CPU threads."),
        click.option("--warm-weights", is_flag=True,
                     help="Read the whole model file first (progress shown), so the first "
                          "tokens do not wait on the disk."),
        click.option("-n", "--max-tokens", default=50000, show_default=True),
        click.option("--temp", "temperature", default=1.0, show_default=True),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--top-k", default=0, show_default=True),
        click.option("--min-p", default=0.05, show_default=True),
        click.option("--seed", default=None, type=int, help="Sampling seed (default: time)."),
        click.option("--think", "think", flag_value="high", default=True, help="Think (default)."),
        click.option("--think-max", "think", flag_value="max", help="Think Max (ctx >= 393216)."),
        click.option("--nothink", "think", flag_value="none", help="Answer without thinking."),
        click.option("--system", default=tmpl.DEFAULT_SYSTEM, show_default=True,
                     help='System text ("" for none).'),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def open_model(model_path, backend, ctx, threads, warm_weights=False, numerics="qat"):
    from .model import load
    t0 = time.time()
    model = load(model_path, backend=backend, ctx=ctx, threads=threads, numerics=numerics)
    if warm_weights and model.backend == "cpu":
        model.warm()
    model.tokenizer  # built now, so the load time below includes it
    if time.time() - t0 > 2:
        click.echo(f"ds4: loaded {os.path.basename(model.path)} in {time.time() - t0:.1f}s",
                   err=True)
    return model


class Printer:
    """Answer to stdout; reasoning to stderr, grey on a terminal."""

    def __init__(self):
        self.grey = sys.stderr.isatty()
        self.in_reasoning = False

    def __call__(self, piece):
        if piece.kind == "reasoning":
            self.in_reasoning = True
            sys.stderr.write(GREY + piece + RESET if self.grey else piece)
            sys.stderr.flush()
        else:
            if self.in_reasoning:
                sys.stderr.write("\n")
                self.in_reasoning = False
            sys.stdout.write(piece)
            sys.stdout.flush()


def prefill_progress():
    """A progress line on stderr for prefills that take more than a few seconds."""
    start = time.time()

    def report(done, total):
        if time.time() - start > 2 or (done < total and time.time() - start > 1):
            click.echo(f"\rds4: prefill {done}/{total} tokens", err=True, nl=done == total)
    return report


def run_turn(session, tokenizer, ids, opts, sampler, thinking):
    """Streams one reply; the timing line is printed even when Ctrl+C stops it."""
    result = Generation()
    printer = Printer()
    t0 = time.time()
    t_first = None
    stopped = False
    try:
        for piece in stream(session, tokenizer, ids, max_tokens=opts["max_tokens"],
                            sampler=sampler, thinking=thinking, result=result,
                            progress=prefill_progress()):
            if t_first is None:
                t_first = time.time()
            printer(piece)
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        t1 = time.time()
        prefill_s = (t_first or t1) - t0
        gen_s = t1 - (t_first or t1)
        sys.stdout.write("\n")
        sys.stdout.flush()
        click.echo(f"ds4: prefill: {result.prefilled_tokens} tokens, "
                   f"{result.prefilled_tokens / max(prefill_s, 1e-9):.1f} t/s, generation: "
                   f"{result.completion_tokens} tokens, "
                   f"{result.completion_tokens / max(gen_s, 1e-9):.1f} t/s"
                   + (" (stopped)" if stopped else ""), err=True)
    return result


def sampler_of(opts, think):
    return Sampler(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                   min_p=opts["min_p"], seed=opts["seed"])


@click.command()
@model_options
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None)
def run(prompt, prompt_file, **opts):
    """Answer one prompt (argument, --prompt-file, or stdin) and exit."""
    sources = [s for s in (prompt is not None, prompt_file is not None) if s]
    if len(sources) > 1:
        raise click.UsageError("give the prompt as an argument or with --prompt-file, not both")
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif prompt is None:
        if sys.stdin.isatty():
            raise click.UsageError("no prompt: pass one, use --prompt-file, or pipe it on stdin")
        prompt = sys.stdin.read()
    model = open_model(opts["model_path"], opts["backend"], opts["ctx"], opts["threads"],
                       opts["warm_weights"], opts["numerics"])
    tok = model.tokenizer
    if prompt.startswith(tmpl.BOS):   # already rendered: server-path tokenization
        ids = tok.encode(prompt, special=True)
        thinking = prompt.rstrip().endswith(tmpl.THINK_OPEN)
        mode = "high" if thinking else "none"
    else:
        mode, warnings = tmpl.resolve_think(opts["think"], opts["ctx"])
        for w in warnings:
            click.echo(f"ds4: {w}", err=True)
        ids = segments_to_ids(tok, tmpl.prompt_segments(prompt, system=opts["system"] or None,
                                                         think=mode, ctx=opts["ctx"]))
        thinking = mode != "none"
    if len(ids) >= opts["ctx"]:
        raise Error(f"the prompt is {len(ids)} tokens, the context only {opts['ctx']}")
    opts["max_tokens"] = min(opts["max_tokens"], opts["ctx"] - len(ids))
    session = model.session(opts["ctx"])
    run_turn(session, tok, ids, opts, sampler_of(opts, mode), thinking)


HELP = """commands:
  /help           this list
  /think          think before answering (default)
  /think-max      Think Max (needs ctx >= 393216, else /think)
  /nothink        answer without thinking
  /ctx N          new context size (starts a new conversation)
  /read FILE      send a file's content as your next message
  /clear          start a new conversation
  /quit           leave (Ctrl+D too); Ctrl+C stops a reply"""


class Conversation:
    """A live token transcript whose KV state is kept between turns."""

    def __init__(self, model, opts):
        self.model, self.opts = model, opts
        self.think = opts["think"]
        self.ctx = opts["ctx"]
        self.reset()

    def reset(self, ctx=None):
        self.ctx = ctx or self.ctx
        self.session = self.model.session(self.ctx)
        self.mode, warnings = tmpl.resolve_think(self.think, self.ctx)
        for w in warnings:
            click.echo(f"ds4: {w}", err=True)
        segs = tmpl.transcript_start_segments(self.opts["system"] or None, think=self.mode,
                                              ctx=self.ctx)
        self.ids = segments_to_ids(self.model.tokenizer, segs)

    def set_think(self, think):
        self.think = think
        mode, warnings = tmpl.resolve_think(think, self.ctx)
        for w in warnings:
            click.echo(f"ds4: {w}", err=True)
        if (mode == "max") != (self.mode == "max"):
            # the Think Max prefix sits right after BOS: the transcript changes
            # there, so the next turn rebuilds the KV state from that point
            tok = self.model.tokenizer
            prefix = segments_to_ids(tok, [tmpl.Segment(tmpl.THINK_MAX_PREFIX)])
            if mode == "max":
                self.ids = self.ids[:1] + prefix + self.ids[1:]
            else:
                self.ids = self.ids[:1] + self.ids[1 + len(prefix):]
        self.mode = mode

    def turn(self, text):
        tok = self.model.tokenizer
        before = list(self.ids)
        ids = self.ids + segments_to_ids(tok, tmpl.user_turn_segments(text, self.mode))
        if len(ids) >= self.ctx:
            click.echo(f"ds4: context full ({len(ids)} of {self.ctx} tokens): /clear or /ctx N",
                       err=True)
            return
        opts = dict(self.opts, max_tokens=min(self.opts["max_tokens"], self.ctx - len(ids)))
        result = Generation()
        try:
            result = run_turn(self.session, tok, ids, opts, sampler_of(self.opts, self.mode),
                              self.mode != "none")
        except KeyboardInterrupt:
            click.echo("ds4: stopped", err=True)
            generated = list(self.session.tokens[len(ids):])
            if not generated:      # nothing came out: the turn never happened
                self.ids = before
                return
            self.ids = ids + generated + [tok.eos_id]
            return
        self.ids = ids + result.tokens + [tok.eos_id]


@click.command()
@model_options
def chat(**opts):
    """Talk with the model: a REPL on a live KV state."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    model = open_model(opts["model_path"], opts["backend"], opts["ctx"], opts["threads"],
                       opts["warm_weights"], opts["numerics"])
    conv = Conversation(model, opts)
    history = FileHistory(os.path.expanduser("~/.ds4_history"))
    prompt = PromptSession(history=history)
    click.echo(HELP, err=True)
    while True:
        try:
            line = prompt.prompt("ds4> ")
        except KeyboardInterrupt:
            continue              # Ctrl+C at the prompt does not exit
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            elif cmd == "/help":
                click.echo(HELP, err=True)
            elif cmd in ("/think", "/think-max", "/nothink"):
                conv.set_think({"/think": "high", "/think-max": "max", "/nothink": "none"}[cmd])
                click.echo(f"ds4: thinking: {conv.mode}", err=True)
            elif cmd == "/ctx":
                if not arg.isdigit() or int(arg) < 64:
                    click.echo("ds4: /ctx needs a number of tokens (at least 64)", err=True)
                else:
                    conv.reset(int(arg))
                    from .cli import kv_memory_bytes
                    click.echo(f"ds4: context {conv.ctx} tokens (KV state up to "
                               f"{kv_memory_bytes(model.config, conv.ctx) / 2**30:.2f} GiB); "
                               "new conversation", err=True)
            elif cmd == "/clear":
                conv.reset()
                click.echo("ds4: new conversation", err=True)
            elif cmd == "/read":
                try:
                    with open(os.path.expanduser(arg), encoding="utf-8") as f:
                        conv.turn(f.read())
                except OSError as exc:
                    click.echo(f"ds4: cannot read {arg!r}: {exc.strerror}", err=True)
            else:
                click.echo(f"ds4: unknown command {cmd} (/help lists them)", err=True)
            continue
        conv.turn(line)
