"""Lightning training of stitched experts: module, data, callbacks, the `soe stitch` run."""
import warnings

# Lightning's own use of a deprecated torch pytree API: not actionable by users, keep output clean.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
