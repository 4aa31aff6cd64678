"""Hugging Face glue: family adapters (`models`), model loading (`loading`), the quantized
attention registration (`attention`), the 4-bit KV `Cache` (`kv_cache`) and the pre-norm
fusion (`norm_fusion`). Everything that knows transformers' classes lives here."""
