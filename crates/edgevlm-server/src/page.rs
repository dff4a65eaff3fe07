//! The chat page served at `/`: one self-contained HTML file (no CDN), embedded in the binary.

use axum::response::Html;

pub async fn chat_page() -> Html<&'static str> {
    Html(include_str!("chat.html"))
}
