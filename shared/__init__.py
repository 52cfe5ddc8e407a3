"""Code every ikefarm service uses: engine, crypto, config, bus runtime, logging, tracing."""
