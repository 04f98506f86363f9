"""The decision-making core: states, events, commands, manifest and policy. No I/O here."""
