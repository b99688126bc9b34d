"""The umT5 encoder against transformers' UMT5EncoderModel, its released layout, and the tokenizers."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import wan

TOL = 1e-4


def hf_to_ours(sd, num_layers):
    """transformers UMT5EncoderModel keys -> official Wan T5Encoder keys (one explicit table)."""
    table = {"encoder.embed_tokens.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    for i in range(num_layers):
        hf, ours = f"encoder.block.{i}.layer.", f"blocks.{i}."
        table.update({
            hf + "0.layer_norm.weight": ours + "norm1.weight",
            **{hf + f"0.SelfAttention.{p}.weight": ours + f"attn.{p}.weight" for p in "qkvo"},
            hf + "0.SelfAttention.relative_attention_bias.weight": ours + "pos_embedding.embedding.weight",
            hf + "1.layer_norm.weight": ours + "norm2.weight",
            hf + "1.DenseReluDense.wi_0.weight": ours + "ffn.gate.0.weight",
            hf + "1.DenseReluDense.wi_1.weight": ours + "ffn.fc1.weight",
            hf + "1.DenseReluDense.wo.weight": ours + "ffn.fc2.weight",
        })
    return {table[k]: v for k, v in sd.items() if k != "shared.weight"}  # shared is tied to embed_tokens


def test_umt5_xxl_layout_on_meta():
    with torch.device("meta"):
        t5 = wan.T5Encoder()
    sd = t5.state_dict()
    assert (len(sd), sum(v.numel() for v in sd.values())) == (242, 5_680_910_336)
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)


def test_matches_transformers_umt5():
    torch.manual_seed(0)
    kw = wan.CONFIGS["tiny"].t5_kwargs
    ref = UMT5EncoderModel(UMT5Config(
        vocab_size=kw["vocab"], d_model=kw["dim"], d_kv=kw["dim_attn"] // kw["num_heads"], d_ff=kw["dim_ffn"],
        num_layers=kw["num_layers"], num_heads=kw["num_heads"], relative_attention_num_buckets=kw["num_buckets"],
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)).eval()
    with torch.device("meta"):
        ours = wan.build_t5(wan.CONFIGS["tiny"])
    wan.load_strict(ours, hf_to_ours(ref.state_dict(), kw["num_layers"]), "UMT5 weights")
    ours.eval()
    # 200 tokens reach the logarithmic and clipped relative-position buckets; sample 1 is padded.
    ids = torch.randint(0, kw["vocab"], (2, 200))
    mask = torch.ones_like(ids)
    mask[1, 37:] = 0
    with torch.no_grad():
        out = ours(ids, mask)
        out_ref = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 200, kw["dim"])
    assert (out - out_ref).abs().max() <= TOL
    assert out.std() > 0.05


def test_encode_text_trims_and_ignores_padding():
    torch.manual_seed(0)
    cfg = wan.CONFIGS["tiny"]
    t5, tok = wan.build_t5(cfg).eval(), wan.load_tokenizer(cfg)
    prompts = ["a cat", "  a woman   smiles at the camera  "]
    context = wan.encode_text(prompts, t5, tok)
    assert [c.shape for c in context] == [(len("a cat") + 1, 32), (len("a woman smiles at the camera") + 1, 32)]
    ids, _ = tok(prompts)
    for c, row in zip(context, ids):
        alone = t5(row[None, : len(c)])[0]  # the prompt alone, no padding at all
        assert (c - alone).abs().max() <= TOL
    with pytest.raises(ValueError, match="vocabulary"):
        t5(torch.tensor([[cfg.t5_kwargs["vocab"]]]))


def test_byte_tokenizer_round_trip():
    tok = wan.ByteTokenizer(text_len=16)

    def decode(ids):  # the inverse of the tokenizer's byte offset
        return bytes(int(i) - tok.offset for i in ids if int(i) >= tok.offset).decode("utf-8", errors="replace")
    ids, mask = tok(["héllo  &amp; bye", "x" * 40])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long
    n = mask[0].sum().item()
    assert n == len("héllo & bye".encode()) + 1 and ids[0, n - 1] == tok.eos and (ids[0, n:] == tok.pad).all()
    assert decode(ids[0]) == "héllo & bye"
    assert mask[1].all() and ids[1, -1] == tok.eos and decode(ids[1]) == "x" * 15  # truncated, eos kept


def write_unigram_tokenizer(folder):
    """A small SentencePiece-style (Unigram + Metaspace) tokenizer.json, laid out like umT5's."""
    words = ["a", "cat", "woman", "smiles", "at", "the", "camera", "&"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz&"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def test_tokenizer_json_matches_transformers(tmp_path):
    write_unigram_tokenizer(tmp_path / "google" / "umt5-xxl")
    cfg = wan.get_config("tiny", text_len=12)
    tok = wan.load_tokenizer(cfg, str(tmp_path))
    # The official HuggingfaceTokenizer: AutoTokenizer, padding to max_length, truncation, special tokens.
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "google/umt5-xxl/tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    prompts = ["a woman smiles at the camera", "a  cat\n&amp;amp;  xyz", "the cat " * 10]
    ids, mask = tok(prompts)
    cleaned = ["a woman smiles at the camera", "a cat & xyz", ("the cat " * 10).strip()]
    expected = ref(cleaned, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)
    assert ids.shape == (3, 12) and ids[0, mask[0].sum() - 1] == 1 and mask[2].all() and ids[2, -1] == 1
    assert mask[0].sum() == 7  # six words and </s>, then <pad>


def test_load_t5_from_folder(tmp_path):
    cfg = wan.CONFIGS["tiny"]
    t5 = wan.build_t5(cfg)
    torch.save({k: v.bfloat16() for k, v in t5.state_dict().items()}, tmp_path / wan.T5_FILE)  # released in bf16
    loaded = wan.load_t5(cfg, str(tmp_path))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in t5.state_dict().items():
        assert loaded.state_dict()[k].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[k], v.bfloat16().float())
