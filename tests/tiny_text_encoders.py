"""Tiny random-weight text encoders of the families that read prompts with an LLM or BERT, and their
tokenizers, built offline.

Each builder returns ``(model, tokenizer)`` (``(model, processor)`` where the pipeline takes a
processor), from the model's transformers config at a few hidden units, so a pipeline that holds one
saves and loads in the published format. The tokenizers come from in-code vocabularies: the shapes
vocabulary of pipeline/models/tokenizer.py, merged into whole tokens by its BPE learner, over a base
that covers any text (all 256 bytes for byte-level BPE, byte fallback for Gemma, single characters
and [UNK] for WordPiece). Special tokens sit first in each vocabulary, so their ids are small and
fixed. Weights are random: the caller seeds torch (tests/tiny_families.py seeds each build).

Not here: Mistral 3's PixtralProcessor (FLUX.2 [dev]) and Qwen2VLProcessor (Qwen-Image-Edit and
Edit-Plus). transformers builds neither without torchvision, which has no build for the CPU PyTorch
that `make setup` installs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    ByT5Tokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    GlmConfig,
    GlmModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from pipeline.models.tokenizer import WORDS, byte_chars, learn_bpe
from tests.tiny_pipelines import t5_tokenizer

# The space byte in the byte-level alphabet: a word after a space is its own token too.
_SPACE = byte_chars()[ord(" ")]


def _byte_level_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens, merges = learn_bpe(list(WORDS) + [_SPACE + w for w in WORDS], byte_chars())
    return {token: i for i, token in enumerate(specials + tokens)}, merges


def byte_level_bpe(specials: list[str], bos: str | None = None, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, as Llama 3, Mistral's Tekken and GLM-4 ship it);
    ``bos`` is put before every text when given."""
    vocab, merges = _byte_level_vocab(specials)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, **kwargs)


# ChatML as the Qwen models write it: images as vision-start / image-pad / vision-end, and Qwen3's
# empty thought when thinking is turned off.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]


def qwen_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2 / 2.5 / 3 byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    vocab, merges = _byte_level_vocab(QWEN_SPECIALS)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=QWEN_SPECIALS[1:],
                          chat_template=QWEN_CHAT_TEMPLATE, model_max_length=32768)


def qwen3(hidden_size: int = 16, num_layers: int = 2, causal_lm: bool = False):
    """Qwen3 (Z-Image reads its base model, FLUX.2 [klein] the causal LM's hidden states)."""
    tokenizer = qwen_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=16,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval(), tokenizer


def qwen2_5_vl(hidden_size: int = 16):
    """Qwen2.5-VL with its vision tower (Qwen-Image, the Qwen-Image-Edit models, HunyuanImage 2.1)."""
    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    special_ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden_size, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     **special_ids},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden_size},
        vocab_size=len(tokenizer), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"), **special_ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's BPE over ``▁``-joined text, falling back to byte tokens for anything unlisted."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    alphabet = [f"<0x{b:02X}>" for b in range(256)] + sorted(set("▁" + "".join(WORDS)))
    tokens, merges = learn_bpe(["▁" + w for w in WORDS], alphabet)
    vocab = {token: i for i, token in enumerate(specials + tokens)}
    return GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials[5:], add_bos_token=True,
                          model_max_length=8192)


def gemma2(hidden_size: int = 8, num_layers: int = 2, head_dim: int = 4):
    """Gemma 2 (SANA, Lumina 2)."""
    tokenizer = gemma_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=16,
                          num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=head_dim, max_position_embeddings=8192, sliding_window=64,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    return Gemma2Model(config).eval(), tokenizer


def glm(hidden_size: int = 32, num_layers: int = 2):
    """GLM-4 (CogView4): byte-level BPE with GLM's ``[gMASK]<sop>`` prefix, padded on the left."""
    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|user|>", "<|assistant|>"]
    tokenizer = byte_level_bpe(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                               extra_special_tokens=specials[1:], padding_side="left", model_max_length=8192)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in ("[gMASK]", "<sop>")])
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=16,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return GlmModel(config).eval(), tokenizer


def llama(hidden_size: int = 16, num_layers: int = 2):
    """Llama 3 (byte-level BPE, ``<|begin_of_text|>`` first; HiDream-I1 reads the causal LM)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = byte_level_bpe(specials, bos="<|begin_of_text|>", eos_token="<|end_of_text|>",
                               pad_token="<|end_of_text|>", extra_special_tokens=specials[2:],
                               model_max_length=131072)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=16,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def bert_tokenizer() -> BertTokenizer:
    """WordPiece: the shapes words whole, single characters (and their ``##`` continuations) for the
    rest; characters outside the list become [UNK]."""
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + list(WORDS)
    return BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))}, model_max_length=512)


def bert(hidden_size: int = 32, num_layers: int = 2):
    """BERT (HunyuanDiT's bilingual CLIP-style encoder is a BertModel)."""
    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37,
                        num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    return BertModel(config).eval(), tokenizer


def umt5(d_model: int = 32):
    """UMT5's encoder (AuraFlow) with the T5 Unigram tokenizer of tests/tiny_pipelines.py."""
    tokenizer = t5_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval(), tokenizer


def byt5(d_model: int = 32):
    """ByT5's encoder: its tokenizer needs no vocabulary (bytes, three specials, 125 sentinels)."""
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval(), tokenizer
