//! Chat templates: the model's Jinja template rendered with minijinja, configured as transformers
//! configures jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`).

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{one_line, Error, Result};
use crate::prompt::{Markers, PromptText};

/// One message in the HF template shape: `content` is a list of `{"type": "text", "text"}` and
/// `{"type": "image"}` parts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TemplateMessage {
    pub role: String,
    pub content: Vec<TemplatePart>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TemplatePart {
    Text { text: String },
    Image,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Text-only models' templates concatenate `message['content']` as a string: render each message's
    /// text parts joined, as transformers passes a plain-string content.
    string_content: bool,
}

/// A message whose content is one string.
#[derive(Serialize)]
struct StringMessage<'a> {
    role: &'a str,
    content: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(one_line(format!("does not compile: {e}"))))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            string_content: false,
        })
    }

    /// Render message content as one string (text-only chat models).
    pub fn with_string_content(mut self) -> Self {
        self.string_content = true;
        self
    }

    /// Render `messages` as [`Self::render`] does, and say which bytes are message text when any
    /// message text `needs_marking` (spells a special token or the image placeholder): those are
    /// then tokenized as text ([`PromptText`]). The text is always exactly what [`Self::render`]
    /// gives; a template that rewrites marked message text (slices, reorders) cannot be split and is
    /// refused for such messages.
    pub fn render_prompt(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
        needs_marking: impl Fn(&str) -> bool,
    ) -> Result<PromptText> {
        let text = self.render(messages, add_generation_prompt)?;
        let flagged = messages
            .iter()
            .flat_map(|m| &m.content)
            .find_map(|p| match p {
                TemplatePart::Text { text } if needs_marking(text) => Some(text.as_str()),
                _ => None,
            });
        let Some(flagged) = flagged else {
            return Ok(PromptText::template(text));
        };
        let markers = Markers::new();
        let marked: Vec<TemplateMessage> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.clone(),
                content: m
                    .content
                    .iter()
                    .map(|p| match p {
                        TemplatePart::Text { text } => TemplatePart::Text {
                            text: markers.wrap(text),
                        },
                        TemplatePart::Image => TemplatePart::Image,
                    })
                    .collect(),
            })
            .collect();
        let rendered = self.render(&marked, add_generation_prompt)?;
        match markers.split(&rendered) {
            Some(p) if p.text == text => Ok(p),
            _ => Err(Error::Template(format!(
                "message text {:?} spells a special token, and this chat template rewrites message text, so it cannot be kept apart from the template's own tokens",
                flagged.chars().take(40).collect::<String>()
            ))),
        }
    }

    /// Render `messages`, ending with the assistant prompt when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(one_line(e)))?;
        let messages = if self.string_content {
            let flat: Vec<StringMessage> = messages
                .iter()
                .map(|m| StringMessage {
                    role: &m.role,
                    content: m
                        .content
                        .iter()
                        .filter_map(|p| match p {
                            TemplatePart::Text { text } => Some(text.as_str()),
                            TemplatePart::Image => None,
                        })
                        .collect(),
                })
                .collect();
            Value::from_serialize(&flat)
        } else {
            Value::from_serialize(messages)
        };
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Template(one_line(format!("rendering failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(role: &str, t: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: vec![TemplatePart::Text { text: t.into() }],
        }
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m.role %}{{ m.role }}: {% endif %}\n  {{ m.content[0].text }}\n{% endfor %}",
            "",
            "",
        )
        .unwrap();
        // jinja2 3.1.6 with trim_blocks + lstrip_blocks renders exactly this.
        assert_eq!(
            t.render(&[text("user", "hi")], false).unwrap(),
            "user:   hi\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = t.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }

    #[test]
    fn broken_template_is_reported() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
