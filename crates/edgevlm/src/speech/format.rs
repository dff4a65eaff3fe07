//! A transcript in the response formats of OpenAI's `/v1/audio/transcriptions`: `json`, `text`,
//! `verbose_json`, `srt` and `vtt`.

use serde_json::json;

use super::Transcript;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFormat {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl ResponseFormat {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "json" => Self::Json,
            "text" => Self::Text,
            "verbose_json" => Self::VerboseJson,
            "srt" => Self::Srt,
            "vtt" => Self::Vtt,
            other => {
                return Err(Error::Request(format!(
                    "response_format `{other}` is not one of json, text, verbose_json, srt, vtt"
                )))
            }
        })
    }

    /// The HTTP content type of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json | Self::VerboseJson => "application/json",
            Self::Text => "text/plain; charset=utf-8",
            Self::Srt => "application/x-subrip; charset=utf-8",
            Self::Vtt => "text/vtt; charset=utf-8",
        }
    }
}

/// `seconds` as `HH:MM:SS{sep}mmm`.
fn clock(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// `t` rendered as `format` (JSON forms end without a newline; text forms with one).
pub fn render(t: &Transcript, format: ResponseFormat) -> String {
    match format {
        ResponseFormat::Json => json!({ "text": t.text }).to_string(),
        ResponseFormat::Text => format!("{}\n", t.text),
        ResponseFormat::VerboseJson => json!({
            "task": t.task,
            "language": t.language,
            "duration": t.duration,
            "text": t.text,
            "segments": t.segments,
        })
        .to_string(),
        ResponseFormat::Srt => t
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "{}\n{} --> {}\n{}\n\n",
                    i + 1,
                    clock(s.start, ','),
                    clock(s.end, ','),
                    s.text.trim()
                )
            })
            .collect(),
        ResponseFormat::Vtt => {
            let mut out = String::from("WEBVTT\n\n");
            for s in &t.segments {
                out.push_str(&format!(
                    "{} --> {}\n{}\n\n",
                    clock(s.start, '.'),
                    clock(s.end, '.'),
                    s.text.trim()
                ));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::Segment;

    fn transcript() -> Transcript {
        let seg = |id, start, end, text: &str| Segment {
            id,
            seek: 0,
            start,
            end,
            text: text.into(),
            tokens: vec![],
            temperature: 0.0,
            avg_logprob: -0.2,
            compression_ratio: 1.1,
            no_speech_prob: 0.01,
        };
        Transcript {
            task: crate::speech::Task::Transcribe,
            text: "Hello there. How are you?".into(),
            language: "en".into(),
            duration: 3725.5,
            segments: vec![
                seg(0, 0.0, 1.5, " Hello there."),
                seg(1, 3723.25, 3725.5, " How are you?"),
            ],
        }
    }

    #[test]
    fn subtitles_and_json_shapes() {
        let t = transcript();
        assert_eq!(
            render(&t, ResponseFormat::Srt),
            "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,500\nHow are you?\n\n"
        );
        assert!(render(&t, ResponseFormat::Vtt)
            .starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n"));
        assert_eq!(
            render(&t, ResponseFormat::Json),
            r#"{"text":"Hello there. How are you?"}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&render(&t, ResponseFormat::VerboseJson)).unwrap();
        assert_eq!(v["segments"][1]["start"], 3723.25);
        assert_eq!(
            (&v["language"], &v["task"]),
            (&"en".into(), &"transcribe".into())
        );
        assert!(ResponseFormat::parse("mp3").is_err());
    }
}
