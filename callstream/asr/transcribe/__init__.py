"""Amazon Transcribe streaming as a `SpeechEngine`: a stream per track (`engine`) or per call
(`stereo`)."""
