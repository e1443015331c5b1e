"""A save: plan the chunks, write the data, commit the manifest; asynchronous saves (staging, the background writer, the helper process)."""
