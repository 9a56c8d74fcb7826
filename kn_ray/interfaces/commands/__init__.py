"""One module per `kn-ray` subcommand (discovered automatically by the CLI)."""


def add_progress_flag(parser, *aliases: str) -> None:
    """--no-progress, one spelling for every long-running command (`args.no_progress`)."""
    parser.add_argument("--no-progress", *aliases, dest="no_progress", action="store_true", help="no progress bar")
