"""Model backends behind the Student, Teacher and Embedder protocols, and the spec registry."""
