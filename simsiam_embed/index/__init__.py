"""The search index: FAISS + SQLite catalog in generations, searching it, previews of its images."""
