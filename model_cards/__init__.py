"""Model-card template (template.md, a Jinja template for huggingface_hub.ModelCard.from_template) and the cards it produced."""
