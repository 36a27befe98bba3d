"""EncoderRunner: owns the device and a BERT-family encoder's weights; turns a step's texts into their
embeddings in one forward pass. No KV pool: an encoder keeps nothing between steps."""
from __future__ import annotations

import logging
import time

import torch

from radixserve.config import ServerArgs
from radixserve.model.bert import BertModel, EncoderInput
from radixserve.model.loader import iter_weights, load_architecture
from radixserve.model.pooling import EmbeddingSpec, check_matryoshka, finish, pool, read_embedding_spec
from radixserve.model.runner import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


class EncoderRunner:
    def __init__(self, args: ServerArgs):
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.architecture, self.config = load_architecture(args.model_path)
        cfg = self.config
        # A raw BertModel folder (no sentence-transformers config) embeds with its [CLS] state, normalised.
        self.spec: EmbeddingSpec = read_embedding_spec(args.model_path, default_pooling="cls")
        self.context_length = min(self.spec.max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if args.context_length:
            if args.context_length > cfg.max_position_embeddings:
                raise ValueError(f"--context-length {args.context_length} exceeds the model's "
                                 f"max_position_embeddings {cfg.max_position_embeddings}")
            self.context_length = args.context_length
        self.embedding_dim = cfg.hidden_size * len(self.spec.pooling)
        self.matryoshka_dimensions = check_matryoshka(args.matryoshka_dimensions or self.spec.matryoshka_dimensions,
                                                      self.embedding_dim)
        start = time.perf_counter()
        self.model = self._load(args.model_path)
        logger.info("loaded %s (%s, %s) in %.1fs: %s pooling%s, %d dims, inputs up to %d tokens",
                    args.model_path, self.dtype, self.device,
                    time.perf_counter() - start, "+".join(self.spec.pooling),
                    ", normalised" if self.spec.normalize else "", self.embedding_dim, self.context_length)
        self._warm_up()

    def _load(self, path: str) -> BertModel:
        with torch.device("meta"):
            model = self.architecture.model(self.config)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_weights((name, w.to(self.device)) for name, w in iter_weights(path, self.dtype))
        return model.eval().requires_grad_(False)

    def _warm_up(self) -> None:
        """One short and one batched forward, so that the first requests do not pay for kernel set-up."""
        for texts in ([[0] * 8], [[0] * 16, [0] * 9]):
            self.embed(texts, [None] * len(texts))

    @torch.inference_mode()
    def embed(self, texts: list[list[int]], dimensions: list[int | None]) -> list[bytes]:
        """Each text's embedding (little-endian float32 bytes), all texts in one forward pass."""
        inp = EncoderInput.pack(texts, self.device)
        hidden = self.model(inp)
        vectors = pool(hidden, self.spec.pooling, inp.seq_ids, inp.starts, inp.lens, inp.positions)
        return finish(vectors, self.spec.normalize, dimensions)
