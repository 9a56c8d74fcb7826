"""One module per `kn-ray` subcommand (discovered automatically by the CLI).

Every argument is a declared option (`kn_ray.fields.option`); the ones several commands take are
declared here once."""

from __future__ import annotations

from dataclasses import dataclass

from kn_ray.fields import option


@dataclass(frozen=True)
class RunDir:
    """The run a stage reads and writes."""

    out: str = option(help="the run's output directory (`kn-ray attribute --output`): a path or URI (s3://bucket/run)",
                      positional=True)


@dataclass(frozen=True)
class Progress:
    """One spelling for every long-running command."""

    no_progress: bool = option(False, "no progress bar (nor the libraries': no 'Loading weights')")

    @staticmethod
    def apply(args) -> bool:
        """Whether to show progress; with --no-progress, library progress bars are switched off too."""
        if getattr(args, "no_progress", False):
            from kn_ray.pipeline.ray_env import no_progress_bars

            no_progress_bars()
        return not getattr(args, "no_progress", False)


def add_command(sub, name: str, run, *, help: str, description: str | None = None):
    """The subcommand `name`'s parser, running `run(args) -> int`; its arguments come from
    `kn_ray.interfaces.declared.add_flags`."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser
