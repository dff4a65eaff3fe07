//! OpenAI-shaped chat completion requests and responses.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::template::{TemplateMessage, TemplatePart};

/// A chat completion request as OpenAI's API takes it. Fields edgevlm honours are typed; fields
/// real clients send that do not change the answer (`store`, `metadata`, `user`, `service_tier`,
/// `parallel_tool_calls`, `prediction`, `reasoning_effort`, and any other) are accepted and ignored
/// ([`ChatRequest::ignored_fields`]); fields it cannot honour in a way that would change the answer
/// (`response_format` other than text, `tools`, `functions`, audio output, web search) are refused
/// by [`ChatRequest::validate`].
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Extension (as in vLLM / llama.cpp's server).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Extension.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Extension.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<Value>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, as OpenAI's) to a bias in [-100, 100].
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Extension (as in llama.cpp's server and vLLM): keep generating past end-of-sequence tokens
    /// until `max_tokens` (for benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Extension (Qwen2-VL family, as mlx-vlm and vLLM's processor arguments): the pixel budget
    /// this request's images are resized to; fewer pixels, fewer image tokens, a faster answer.
    #[serde(default)]
    pub min_pixels: Option<usize>,
    #[serde(default)]
    pub max_pixels: Option<usize>,
    /// Every other field, kept to be reported as ignored or refused.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Fields a client may send that edgevlm refuses, because ignoring them would change the answer.
const REFUSED_FIELDS: &[(&str, &str)] = &[
    ("functions", "function calling is not supported"),
    ("function_call", "function calling is not supported"),
    ("audio", "audio output is not supported"),
    ("web_search_options", "web search is not supported"),
];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    /// Speech (OpenAI's `input_audio` part): transcribed by the engine's speech model, its text
    /// then stands in the message as the user's words.
    InputAudio {
        input_audio: InputAudio,
    },
}

/// An `input_audio` part's payload: base64 audio and its format (`wav`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct InputAudio {
    pub data: String,
    pub format: String,
}

impl InputAudio {
    /// The decoded audio, checked as `limits` say (WAV only).
    pub fn decode(&self, limits: &crate::audio::AudioLimits) -> Result<crate::audio::Waveform> {
        use base64::Engine as _;
        let name = "input_audio";
        if !self.format.eq_ignore_ascii_case("wav") {
            return Err(Error::Request(format!(
                "input_audio format `{}` is not supported (wav)",
                self.format
            )));
        }
        if self.data.len() as u64 > limits.max_bytes.saturating_mul(4) / 3 + 4 {
            return Err(Error::Audio {
                source_name: name.into(),
                message: format!("over the limit of {} bytes", limits.max_bytes),
            });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.data.trim())
            .map_err(|e| Error::Request(format!("input_audio data is not valid base64: {e}")))?;
        crate::audio::decode_wav(&bytes, name, limits)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Plain(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url, .. } => url,
            ImageUrl::Plain(u) => u,
        }
    }
}

/// OpenAI's sampling temperature range.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// OpenAI's largest `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl ChatRequest {
    /// Check what can be checked without a model: message shapes and roles, number ranges (as
    /// OpenAI's API bounds them), `stop`, `n` and logprob settings. Cheap: run it before loading.
    pub fn validate(&self) -> Result<()> {
        // Audio parts are checked when transcribed (the engine's speech model reads them).
        self.template_messages_with(true)?;
        let bad = |m: String| Err(Error::Request(m));
        for (field, why) in REFUSED_FIELDS {
            if self.other.get(*field).is_some_and(|v| !v.is_null()) {
                return bad(format!("`{field}`: {why}"));
            }
        }
        if let Some(m) = self.other.get("modalities").and_then(Value::as_array) {
            if m.iter().any(|x| x.as_str() != Some("text")) {
                return bad("`modalities`: only text output is supported".into());
            }
        }
        if let Some(f) = &self.response_format {
            match f.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(other) => {
                    return bad(format!(
                        "response_format `{other}` is not supported yet (edgevlm cannot constrain output to JSON)"
                    ))
                }
                None => return bad("response_format needs a `type`".into()),
            }
        }
        let tool_choice_none = self.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) && !tool_choice_none {
            return bad(
                "`tools`: tool calling is not supported (send no tools, or tool_choice \"none\")"
                    .into(),
            );
        }
        if let Some(bias) = &self.logit_bias {
            for (k, v) in bias {
                if k.parse::<u32>().is_err() {
                    return bad(format!("logit_bias key `{k}` is not a token id"));
                }
                if !(-100.0..=100.0).contains(v) {
                    return bad(format!(
                        "logit_bias of token {k} must be in [-100, 100], got {v}"
                    ));
                }
            }
        }
        if let Some(n) = self.n {
            if n != 1 {
                return bad(format!(
                    "n = {n}: one choice per request is supported (n = 1)"
                ));
            }
        }
        let in_range = |name: &str, v: Option<f32>, lo: f32, hi: f32, lo_open: bool| match v {
            Some(x) if !(x <= hi && (x > lo || (!lo_open && x == lo))) => {
                Err(Error::Request(format!(
                    "{name} must be in {}{lo}, {hi}], got {x}",
                    if lo_open { "(" } else { "[" }
                )))
            }
            _ => Ok(()),
        };
        in_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE, false)?;
        in_range("top_p", self.top_p, 0.0, 1.0, true)?;
        in_range("min_p", self.min_p, 0.0, 1.0, false)?;
        in_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            100.0,
            true,
        )?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        in_range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        match (self.logprobs, self.top_logprobs) {
            (Some(true), _) | (_, None) => {}
            (_, Some(_)) => return bad("top_logprobs requires logprobs: true".into()),
        }
        if let Some(n) = self.top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return bad(format!(
                    "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
                ));
            }
        }
        if let Some(stop) = &self.stop {
            let stops: &[String] = match stop {
                StopField::One(s) => std::slice::from_ref(s),
                StopField::Many(v) => v,
            };
            if stops.len() > 4 || stops.iter().any(String::is_empty) {
                return bad("`stop` takes up to 4 non-empty strings".into());
            }
        }
        if self.max_completion_tokens.or(self.max_tokens) == Some(0) {
            return bad("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    /// Fields of the request that edgevlm accepts without acting on them.
    pub fn ignored_fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .other
            .keys()
            .map(String::as_str)
            .filter(|k| !REFUSED_FIELDS.iter().any(|(f, _)| f == k))
            .collect();
        if self.user.is_some() {
            out.push("user");
        }
        out
    }

    /// Messages in a chat template's shape, plus the image references in prompt order.
    pub fn template_messages(&self) -> Result<(Vec<TemplateMessage>, Vec<String>)> {
        self.template_messages_with(false)
    }

    /// The `input_audio` parts, in order.
    pub fn audio_parts(&self) -> Vec<&InputAudio> {
        self.messages
            .iter()
            .filter_map(|m| match &m.content {
                Some(MessageContent::Parts(parts)) => Some(parts),
                _ => None,
            })
            .flatten()
            .filter_map(|p| match p {
                ContentPart::InputAudio { input_audio } => Some(input_audio),
                _ => None,
            })
            .collect()
    }

    /// This request with its `input_audio` parts replaced, in order, by text parts holding `texts`.
    pub fn with_transcripts(&self, texts: &[String]) -> Self {
        let mut out = self.clone();
        let mut next = texts.iter();
        for m in &mut out.messages {
            if let Some(MessageContent::Parts(parts)) = &mut m.content {
                for p in parts.iter_mut() {
                    if matches!(p, ContentPart::InputAudio { .. }) {
                        *p = ContentPart::Text {
                            text: next.next().cloned().unwrap_or_default(),
                        };
                    }
                }
            }
        }
        out
    }

    fn template_messages_with(
        &self,
        allow_audio: bool,
    ) -> Result<(Vec<TemplateMessage>, Vec<String>)> {
        if self.messages.is_empty() {
            return Err(Error::Request("`messages` is empty".into()));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        let mut images = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(Error::Request(format!(
                        "messages[{i}]: role `{other}` is not supported (system, user, assistant)"
                    )))
                }
            };
            let content = match &m.content {
                None => return Err(Error::Request(format!("messages[{i}] has no content"))),
                Some(MessageContent::Text(t)) => vec![TemplatePart::Text { text: t.clone() }],
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => Ok(TemplatePart::Text { text: text.clone() }),
                        ContentPart::ImageUrl { image_url } => {
                            images.push(image_url.url().to_string());
                            Ok(TemplatePart::Image)
                        }
                        ContentPart::InputAudio { .. } if allow_audio => Ok(TemplatePart::Text {
                            text: String::new(),
                        }),
                        ContentPart::InputAudio { .. } => Err(Error::Request(format!(
                            "messages[{i}]: an input_audio part needs a speech model (this engine has none: load one with --speech-model)"
                        ))),
                    })
                    .collect::<Result<_>>()?,
            };
            out.push(TemplateMessage {
                role: role.to_string(),
                content,
            });
        }
        Ok((out, images))
    }

    /// Parse a JSON request, with a one-line error on malformed input.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Request(format!("request JSON: {e}")))
    }

    /// A request with one user message: optional images first, then the text.
    pub fn simple(system: Option<&str>, prompt: &str, images: &[String]) -> Self {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: Some(MessageContent::Text(s.into())),
                name: None,
            });
        }
        let mut parts: Vec<ContentPart> = images
            .iter()
            .map(|u| ContentPart::ImageUrl {
                image_url: ImageUrl::Object {
                    url: u.clone(),
                    detail: None,
                },
            })
            .collect();
        parts.push(ContentPart::Text {
            text: prompt.into(),
        });
        messages.push(ChatMessage {
            role: "user".into(),
            content: Some(MessageContent::Parts(parts)),
            name: None,
        });
        Self {
            messages,
            ..Default::default()
        }
    }
}

/// `chat.completion`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub system_fingerprint: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
    /// Always `null`: the model's text is its answer (OpenAI sends a refusal message here).
    #[serde(default)]
    pub refusal: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// OpenAI's `prompt_tokens_details.cached_tokens`: prompt positions reused, not computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `chat.completion.chunk`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    #[serde(default)]
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless the request asked for usage (`stream_options.include_usage`); then `null` on
    /// every chunk but a last one, whose `choices` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// What every response object of one completion shares, and how each is built: the role chunk, text
/// chunks, the closing chunks and the whole `chat.completion` (the OpenAI mapping the CLI, the
/// library and the server all use).
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionBuilder {
    pub id: String,
    pub created: u64,
    /// The name responses carry: the request's, or the name the model is served under.
    pub model: String,
    pub system_fingerprint: String,
    /// Whether the request asked for logprobs.
    pub logprobs: bool,
    /// Whether the request asked for usage in the stream (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl CompletionBuilder {
    pub fn new(model: &str, req: &ChatRequest) -> Self {
        Self {
            id: completion_id(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: model.to_string(),
            system_fingerprint: format!("edgevlm-{}", env!("CARGO_PKG_VERSION")),
            logprobs: req.logprobs == Some(true),
            include_usage: req
                .stream_options
                .as_ref()
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: Some(self.system_fingerprint.clone()),
            choices,
            usage: self.include_usage.then_some(None),
        }
    }

    fn choice(
        delta: Delta,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<FinishReason>,
    ) -> ChunkChoice {
        ChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish,
        }
    }

    /// The first chunk: the assistant's role and empty text.
    pub fn role_chunk(&self) -> ChatCompletionChunk {
        let delta = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        self.chunk(vec![Self::choice(delta, None, None)])
    }

    /// A piece of answer text, with the logprob entries of the tokens that completed it.
    pub fn text_chunk(&self, text: String, logprobs: Vec<TokenLogprob>) -> ChatCompletionChunk {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        let lp = self
            .logprobs
            .then_some(ChoiceLogprobs { content: logprobs });
        self.chunk(vec![Self::choice(delta, lp, None)])
    }

    /// The closing chunks: the finish reason, then (when asked for) the usage with no choices.
    pub fn finish_chunks(&self, finish: FinishReason, usage: Usage) -> Vec<ChatCompletionChunk> {
        let mut out = vec![self.chunk(vec![Self::choice(Delta::default(), None, Some(finish))])];
        if self.include_usage {
            let mut last = self.chunk(Vec::new());
            last.usage = Some(Some(usage));
            out.push(last);
        }
        out
    }

    /// The whole answer as one `chat.completion`.
    pub fn completion(
        &self,
        text: String,
        finish: FinishReason,
        logprobs: Vec<TokenLogprob>,
        usage: Usage,
    ) -> ChatCompletion {
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: text,
                    refusal: None,
                },
                logprobs: self
                    .logprobs
                    .then_some(ChoiceLogprobs { content: logprobs }),
                finish_reason: finish,
            }],
            usage,
            system_fingerprint: Some(self.system_fingerprint.clone()),
        }
    }
}

/// A fresh `chatcmpl-…` id.
pub fn completion_id() -> String {
    let mut rng = crate::sampling::Rng::new(crate::prompt::random_u64());
    format!(
        "chatcmpl-{:016x}{:08x}",
        rng.next_u64(),
        rng.next_u64() as u32
    )
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_shapes() {
        let r = ChatRequest::from_json(
            r#"{"model":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"what"},
                  {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                  {"type":"image_url","image_url":"file:///tmp/a.png"}]}],
               "stop":"\n","max_tokens":5,"logprobs":true,"top_logprobs":2}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert!(matches!(r.stop, Some(StopField::One(ref s)) if s == "\n"));
        match &r.messages[1].content {
            Some(MessageContent::Parts(p)) => {
                assert!(
                    matches!(&p[2], ContentPart::ImageUrl { image_url } if image_url.url() == "file:///tmp/a.png")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_clients_send_is_accepted_ignored_or_refused() {
        let r = ChatRequest::from_json(
            r#"{"messages":[{"role":"user","content":"x"}],"store":false,"metadata":{"a":"b"},
                "service_tier":"auto","parallel_tool_calls":true,"user":"u","temprature":1,
                "frequency_penalty":0.5,"presence_penalty":-0.5,"logit_bias":{"42":-100},
                "response_format":{"type":"text"},"tools":[],"modalities":["text"]}"#,
        )
        .unwrap();
        r.validate().unwrap();
        let mut ignored = r.ignored_fields();
        ignored.sort_unstable();
        assert_eq!(
            ignored,
            [
                "metadata",
                "modalities",
                "parallel_tool_calls",
                "service_tier",
                "store",
                "temprature",
                "user"
            ]
        );
        for (body, want) in [
            (
                r#""response_format":{"type":"json_schema","json_schema":{}}"#,
                "json_schema",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
                "tool calling",
            ),
            (r#""functions":[{"name":"f"}]"#, "function calling"),
            (r#""audio":{"voice":"alloy"}"#, "audio"),
            (r#""frequency_penalty":3"#, "frequency_penalty"),
            (r#""logit_bias":{"x":1}"#, "logit_bias"),
        ] {
            let r = ChatRequest::from_json(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],{body}}}"#
            ))
            .unwrap();
            let e = match r.validate() {
                Ok(()) => panic!("{body} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = ChatRequest::from_json("{").unwrap_err().to_string();
        assert!(e.starts_with("invalid request: request JSON"), "{e}");
    }

    #[test]
    fn finish_reason_serialises_lowercase() {
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).unwrap(),
            "\"length\""
        );
    }
}
