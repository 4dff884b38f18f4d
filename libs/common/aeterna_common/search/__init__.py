"""Hybrid retrieval helpers: BM25 sparse vectors (:mod:`.lexical`) and score fusion
(:mod:`.fusion`)."""

from aeterna_common.search.fusion import dbsf, minmax, rrf
from aeterna_common.search.lexical import BM25Encoder, encode_document, encode_query, tokenize

__all__ = ["BM25Encoder", "dbsf", "encode_document", "encode_query", "minmax", "rrf", "tokenize"]
