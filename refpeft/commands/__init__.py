"""One module per `refpeft` subcommand (see refpeft.cli.COMMANDS)."""
