"""Text generation: prefill + jit-compiled decode over the absorbed-MLA latent cache.

`generate(model, prompt_ids, max_new_tokens=..., temperature=0.0)` -> new token ids per prompt;
`jaxmoe-generate` (`jaxmoe.generate.cli`) is the command line. `jaxmoe.generate` (the package
attribute of `jaxmoe`) is this function; import the parts as `from jaxmoe.generate.engine import
...`.
"""

from jaxmoe.generate.engine import GenerateError, Generation, generate, run

__all__ = ["GenerateError", "Generation", "generate", "run"]
