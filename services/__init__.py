"""The ikefarm services; each runs as its own OS process and talks only over NATS."""
