"""Mesh presets and logical -> mesh axis rules (the presets land with the parallelism issue).

Model code names only the logical axes of `jaxmoe.axes`; everything mesh-specific lives here.
"""
