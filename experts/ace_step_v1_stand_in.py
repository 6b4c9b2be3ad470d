"""A shape-only stand-in of ACE-Step v1's transformer (soe/plugin/stand_in.py): its 24 blocks with the real
module names and shapes, and every parameter outside the blocks counted from the config.
``AceStepV1Expert.stand_in`` uses it for ``soe inspect``; tests/test_stand_in.py checks it against the
model built on the meta device for every preset."""
from __future__ import annotations

from torch import nn

from soe.plugin.stand_in import Attention, Params, StandInModel, linear


def stand_in_model(c: dict) -> StandInModel:
    """The stand-in for the full config ``c`` (constructor defaults filled in)."""
    heads, d = c["num_attention_heads"], c["num_attention_heads"] * c["attention_head_dim"]
    if c["inner_dim"] != d:  # as the model itself refuses
        raise ValueError(f"inner_dim={c['inner_dim']} must equal num_attention_heads*attention_head_dim={d}")
    hl, ff, hidden = c["lyric_hidden_size"], c["lyric_encoder_ff_dim"], int(d * c["mlp_ratio"])
    if hl % c["lyric_encoder_heads"]:
        raise ValueError(f"lyric encoder width {hl} must be divisible by {c['lyric_encoder_heads']} heads")

    def conv(i, o, k=1, groups=1, bias=True, act=False):
        layer = Params()
        layer.conv = nn.Conv1d(i, o, k, padding=k // 2, groups=groups, bias=bias, device="meta")
        layer.act = nn.SiLU() if act else None
        return layer

    def block():
        b = Params(scale_shift_table=(6, d))
        b.norm1, b.attn = Params(), Attention(d, d, heads)
        b.cross_attn = Attention(d, d, heads, add_k_proj=linear(d, d), add_v_proj=linear(d, d), add_q_proj=linear(d, d),
                                 to_add_out=linear(d, d))
        b.norm2, b.ff = Params(), Params()
        b.ff.glu_act = nn.SiLU()
        b.ff.inverted_conv = conv(d, 2 * hidden, act=True)
        b.ff.depth_conv = conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        b.ff.point_conv = conv(hidden, d, bias=False)
        return b

    (p, q), stem = c["patch_size"], c["patch_embed_channels"] or c["in_channels"] * 256
    lyric_layer = 2 * hl + 4 * (hl * hl + hl) + hl * hl + (hl * ff + ff) + (ff * hl + hl) + 4 * hl
    outside = (256 * d + d + d * d + d  # timestep_embedder
               + d * 6 * d + 6 * d  # t_block
               + c["speaker_embedding_dim"] * d + d + c["text_embedding_dim"] * d + d  # speaker_embedder, genre_embedder
               + c["lyric_encoder_vocab_size"] * hl  # lyric_embs
               + hl * hl + 3 * hl + c["lyric_encoder_layers"] * lyric_layer + 2 * hl  # lyric_encoder
               + hl * d + d  # lyric_proj
               + sum(d * 2 * d + 2 * d + 4 * d * d + 2 * d + 2 * d * s + s for s in c["ssl_latent_dims"])  # projectors
               + c["in_channels"] * stem * p * q + 3 * stem + stem * d + d  # proj_in
               + 2 * d + d * p * q * c["out_channels"] + p * q * c["out_channels"])  # final_layer
    return StandInModel(c, "transformer_blocks", [block() for _ in range(c["num_layers"])], outside, inner_dim=d)
