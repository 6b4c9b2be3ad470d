"""Lightning training of stitched experts: module, data, callbacks, the `soe stitch` run."""
