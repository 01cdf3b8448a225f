"""The model-version format: the contract between the server and the tools that build, edit and publish
versions. A version folder holds a manifest (schema, checksums), the ONNX graphs, the tokenizer and the
look-up vocabularies, and golden requests; `repository` scans, stages and publishes such folders, and
`features` turns a request into the graph's input tensors exactly as the version was built to read them."""
