"""`ds4 download`: fetch a published model file, resumably."""
import os
import sys

import click

from . import download as dl
from .errors import Error

TARGET_HELP = "\n".join(f"  {name:11s} {about}" for name, (_, about) in dl.TARGETS.items())


@click.command(help=f"""Download a DeepSeek V4 Flash GGUF from the Hugging Face Hub
({dl.REPO}). An interrupted download resumes when run again.

\b
TARGET (default {dl.DEFAULT_TARGET}):
{TARGET_HELP}""")
@click.argument("target", required=False, default=dl.DEFAULT_TARGET,
                type=click.Choice(list(dl.TARGETS)))
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Where to put the file (default: $DS4_HOME/models, ~/.cache/ds4/models).")
@click.option("--token", default=None,
              help="Hugging Face token (default: $HF_TOKEN, else the saved `hf auth login`).")
def download(target, directory, token):
    def note(msg):
        click.echo(f"ds4: {msg}", err=True)

    try:
        # A progress bar only where someone watches it: redrawn lines would clutter a log.
        result = dl.download(target, directory=directory, token=token, note=note,
                             progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        part = dl.partial_path(dl.target_path(target, directory))
        kept = os.path.getsize(part) if os.path.isfile(part) else 0
        tail = (f": {dl.human(kept)} kept in {part}, run the same command again to resume"
                if kept else "")
        click.echo(f"\nds4: download interrupted{tail}", err=True)
        sys.exit(130)

    path = result.path
    if result.fetched == 0:
        click.echo(f"already downloaded: {path}")
    else:
        click.echo(f"downloaded: {path}")
    if target == "mtp":
        click.echo("This is the optional MTP speculative-decoding component, "
                   "not a model to run on its own.")
    elif _found_by_default(path):
        click.echo("`ds4 run` and `ds4 chat` use it when no -m is given.")
    else:
        click.echo(f"Use it with: ds4 run -m {path}")


def _found_by_default(path):
    from .model import resolve_model_path
    try:
        return os.path.abspath(resolve_model_path()) == path
    except Error:
        return False
