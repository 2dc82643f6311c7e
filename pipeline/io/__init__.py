"""Reading inputs and writing outputs: shards, activation files, the output layout, the run summary."""
