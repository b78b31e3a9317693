"""Diffusers pipelines shipped by diffad, in community-pipeline format (installed as ``diffad.pipelines``)."""
