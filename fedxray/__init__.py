"""The `fedxray` command: the top layer, above every package it gathers subcommands from."""
