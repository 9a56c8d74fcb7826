"""One module per `kn-ray` subcommand (discovered automatically by the CLI)."""
