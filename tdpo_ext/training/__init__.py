"""The training application built on the tdpo_ext library: the `tdpo-train` command line
(train.py), its configuration, loop, checkpoints, data, models, tasks, plots, and the
`tdpo-experiment` frontier experiment. The library (tdpo_ext's ops and fused LM-head loss)
never imports this package, so `import tdpo_ext` needs none of its dependencies."""
import os

# The embedded task's files: vocabulary, review corpus, VADER lexicon subset.
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
