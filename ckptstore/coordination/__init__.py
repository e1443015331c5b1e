"""The only layer that calls torch.distributed: collectives with bounded waits on a process group, key-value exchanges on the job's store, the names of absent ranks."""
