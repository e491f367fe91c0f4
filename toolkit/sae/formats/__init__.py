"""SAE file formats: each reader returns Weights(cfg, tensors, source) under our names and conventions
(W_enc (d_in, d_sae), W_dec (d_sae, d_in)), so our encode/decode reproduce the peer's maths, and refuses with a
CheckpointError naming the file what it cannot reproduce exactly. `SAE.from_*` builds the module from them;
our own folder format is `SAE.save` / `SAE.load`.
"""

from toolkit.sae.formats.dictionary_learning import read_dictionary_learning
from toolkit.sae.formats.gemma_scope import DEFAULT_L0, gemma_scope_path, read_gemma_scope
from toolkit.sae.formats.saelens import read_saelens
from toolkit.sae.formats.sparsify import read_sparsify

__all__ = ["DEFAULT_L0", "gemma_scope_path", "read_dictionary_learning", "read_gemma_scope", "read_saelens",
           "read_sparsify"]
