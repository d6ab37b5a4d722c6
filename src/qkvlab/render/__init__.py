"""Text and page primitives with no knowledge of any result: fixed-width and Markdown tables, the page
model (sections, tables, figures) and its HTML and Markdown writers. The report builds pages from them;
``qkvlab inspect`` and the claims print with them."""
