"""Pipeline stages, one readable module each, and the pipeline YAML files."""
