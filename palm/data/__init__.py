"""Data for training: documents from files, the Hub or the standard library (`documents`), the
packed-blocks format (`packed`), `palm build-dataset` (`build`), and the resumable training
loaders (`loader`)."""
