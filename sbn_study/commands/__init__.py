"""The subcommands, one module per stage of the flow: each declares its commands' arguments and runs them."""
