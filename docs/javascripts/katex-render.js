// Renders the formulas that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \] in
// elements of class "arithmatex". KaTeX and its fonts are served by the site itself
// (docs/javascripts/katex/, KaTeX 0.16.47, MIT): the docs render formulas offline.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
