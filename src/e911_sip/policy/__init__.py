"""Emergency policy: which calls are emergency calls and how they are enriched (pure)."""
