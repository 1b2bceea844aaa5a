"""What the stage entry points share: the pipeline's file layout and how a stage process starts."""
