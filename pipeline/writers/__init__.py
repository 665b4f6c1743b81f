"""Output formats, one writer class per format behind one interface (writers/base.py), and the
job's shard writer (writers/shards.py) that cuts the pipeline's tables into published shards."""
