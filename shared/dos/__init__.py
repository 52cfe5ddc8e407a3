"""DoS protection, sans-I/O: cookies, the ingress gate, farm-wide load, the workers' admission.

Ingress decides before any worker spends a DH computation (`gate.py`); the
worker re-checks just before DH (`admission.py`) as the final authority. Both
read the limits from `limits.py` and the farm's load from `load.py`; neither
reads a clock or touches a socket (docs/principles.md, principle 1).
"""
