"""A synthetic CC3M/VisDial/MMDialog set drawn from shape scenes (the offline demo's data)."""
