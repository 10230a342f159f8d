"""learnloop's serving side: protocol, gateway, engine, settings, app wiring and the CLI."""
