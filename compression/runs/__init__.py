"""What a user launches and keeps: recipes, the pipeline, background jobs, exports."""
