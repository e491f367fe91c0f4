"""Paper recipes on the toolkit's steering, probe and SAE pieces, each reproduced offline on the default model.

- `mosaic`: SAE-feature text classifiers vs hidden-state and TF-IDF baselines (Gallifant et al. 2025).
- `truth`: a contradiction probe per layer whose direction also steers (O'Neill et al. 2025).
- `personality`: Big Five trait vectors, purified against each other, steered and judged (Handa et al. 2025).
- `corrsteer`: latents correlated with correct answers, added at the last position (Cho et al. 2025).
- `unlearning`: negative clamping of forget-domain latents where active (Farrell, Lau, Conmy 2024).
- `detox`: hostile-text latents suppressed in three tiers, scored by a lexicon and fluency (Goyal et al. 2025).

Each recipe's hand-written data set is `load_data(name)` (JSON in `data/`, with a `how_made` line).
"""

from toolkit.analysis.recipes._data import DATASETS, load_data

__all__ = ["DATASETS", "load_data"]
