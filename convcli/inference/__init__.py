"""Inference: `ConversationModel`, MMI reranking, chat sessions."""
