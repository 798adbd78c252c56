"""codellama-jax: a JAX/Flax NNX inference stack for CodeLlama-70B-Instruct and the Llama family."""

from codellama_jax.chat_template import ChatTemplate
from codellama_jax.config import LlamaConfig
from codellama_jax.generation import Completion, chat, generate, stream
from codellama_jax.loader import Model, load
from codellama_jax.model import Llama
from codellama_jax.plan import plan
from codellama_jax.sharding import make_mesh
from codellama_jax.speculative import Speculation
from codellama_jax.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "ChatTemplate",
    "Completion",
    "IncrementalDetokenizer",
    "Llama",
    "LlamaConfig",
    "Model",
    "Speculation",
    "Tokenizer",
    "chat",
    "generate",
    "load",
    "make_mesh",
    "plan",
    "stream",
]
